"""Explaining and scoring nodes through the OpenAI API, against our own local server that speaks
its protocol, driven through the real `openai` client; and offline with the baselines."""

from __future__ import annotations

import asyncio
import json
import math
import re
import sqlite3
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from interpql.backends.explanations.api import ApiSettings
from interpql.backends.explanations.normalize import normalize_activations
from interpql.backends.tokenizer import gpt2_encoding
from interpql.loaders.auth import ApiKeys, hash_key
from interpql.loaders.explaining import ExplanationService
from interpql.loaders.jobs import JobManager
from interpql.loaders.registry import ModelRegistry
from interpql.loaders.sources import CompactSource, ExplanationStore
from interpql.loaders.sources.compact_format import RecordStore
from interpql.resolvers.context import RequestContext, Services
from interpql.schema.build import build_schema
from interpql.server import create_app
from interpql.specs import parse_node_id
from tests.conftest import CountingBackend, error_codes, graphql, small_entry
from tests.fake_openai import FakeOpenAI, chat_answer, reply, slow, status

NODE = "small/mlp_neuron/1/7"
KEY = "interpql-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
EXPLANATION = "closing brackets at the end of a line"


def token_text(token: int) -> str:
    return gpt2_encoding().decode_single_token_bytes(token).decode("utf-8", errors="replace")


def simulation_rule(body: dict[str, Any]) -> tuple[int, dict[str, Any], float]:
    """Explains when asked to explain; simulates position % 11 for every token otherwise."""
    system = body["messages"][0]["content"]
    if "summarize" in system:
        return 200, chat_answer(EXPLANATION), 0.0
    count = int(re.search(r"Tokens \((\d+),", body["messages"][1]["content"]).group(1))  # type: ignore[union-attr]
    return 200, chat_answer(json.dumps({"activations": [i % 11 for i in range(count)]})), 0.0


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(default_chat=simulation_rule) as server:
        yield server


@pytest.fixture
async def setup(
    fake: FakeOpenAI, small_backend: CountingBackend, records_dir: Path, tmp_path: Path
) -> AsyncIterator[tuple[httpx.AsyncClient, Services]]:
    registry = ModelRegistry()
    entry = small_entry(small_backend)
    entry.sources.append(CompactSource.open("test-dataset", records_dir, token_text))
    registry.add(entry)
    jobs = JobManager(max_jobs_per_key=2, max_tokens_per_key=10_000)
    api = ApiSettings(
        base_url=fake.base_url, api_key="sk-fake", timeout_s=1.0, max_retries=2, simulator="json"
    )
    store = ExplanationStore(tmp_path / "explanations.sqlite")
    services = Services(
        registry,
        jobs=jobs,
        explaining=ExplanationService(store, registry.search, jobs, api),
        api_keys=ApiKeys(hashes=[hash_key(KEY)]),
    )
    transport = httpx.ASGITransport(app=create_app(services))
    async with httpx.AsyncClient(
        transport=transport, base_url="http://localhost", headers=AUTH
    ) as client:
        yield client, services
    await jobs.shutdown()
    assert services.explaining is not None
    await services.explaining.close()
    store.close()
    registry.close()


async def run_job(
    client: httpx.AsyncClient, mutation: str, variables: dict[str, Any]
) -> dict[str, Any]:
    body = await graphql(client, mutation, variables)
    assert "errors" not in body, body
    job_id = next(iter(body["data"].values()))["id"]
    # By the clock, not by a count of polls: a job that retries timed-out calls takes seconds
    # of wall time however fast each poll is answered.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        state = await graphql(
            client,
            "query($id: ID!) { job(id: $id) { status progress message error fromStore "
            "result { text score scorer explainerModel source } node { id } } }",
            {"id": job_id},
        )
        job = state["data"]["job"]
        if job["status"] in ("SUCCEEDED", "FAILED"):
            return {"id": job_id, **job}
        await asyncio.sleep(0.02)
    raise AssertionError("job did not finish")


EXPLAIN = 'mutation($n: ID!) { explainNode(nodeId: $n, options: {method: "api"}) { id status } }'
SCORE = (
    "mutation($n: ID!, $t: String!) { scoreExplanation(nodeId: $n, text: $t, "
    'options: {method: "api"}) { id status } }'
)


def held_out_truth(records_dir: Path) -> list[list[float]]:
    record = RecordStore.load(records_dir / "records").node_record("mlp_neuron", 1, 7)
    held = [e for e in record.top[1::2] if e.offset >= 0] + [
        e for e in record.random[:5] if e.offset >= 0
    ]
    return [list(e.activations) for e in held]


def expected_score(truth: list[list[float]]) -> float:
    simulated = np.concatenate([np.arange(len(t)) % 11 for t in truth]).astype(float)
    return float(np.corrcoef(np.concatenate(truth), simulated)[0, 1])


async def test_explain_node_through_the_api(
    setup: tuple[httpx.AsyncClient, Services], fake: FakeOpenAI, records_dir: Path
) -> None:
    client, services = setup
    job = await run_job(client, EXPLAIN, {"n": NODE})
    assert job["status"] == "SUCCEEDED" and job["fromStore"] is False, job
    [result] = job["result"]
    assert result["text"] == EXPLANATION and result["source"] == "generated"
    assert result["explainerModel"] == "gpt-4o-mini"
    assert result["score"] == pytest.approx(expected_score(held_out_truth(records_dir)), abs=1e-9)
    # Calibration is kept with the explanation's provenance.
    assert services.explaining is not None
    [stored] = services.explaining.store.all()
    assert -10 < stored.provenance["calibrated_rsquared"] <= 1
    # The explainer saw the node's top records, on the 0-10 scale.
    record = RecordStore.load(records_dir / "records").node_record("mlp_neuron", 1, 7)
    prompt = fake.calls("chat")[0]["messages"][1]["content"]
    shown = record.top[0]
    scale = max(max(e.activations) for e in record.top[0::2])
    for token, value in zip(
        shown.token_ids, normalize_activations(shown.activations, scale), strict=True
    ):
        assert f"{token_text(token)}\t{value}" in prompt
    # Stored: it shows in the node's explanations, and in search.
    node = await graphql(client, f'{{ node(id: "{NODE}") {{ explanations {{ text source }} }} }}')
    assert {"text": EXPLANATION, "source": "generated"} in node["data"]["node"]["explanations"]
    found = await graphql(
        client, '{ searchNodes(text: "closing brackets") { edges { node { id } } } }'
    )
    assert NODE in [e["node"]["id"] for e in found["data"]["searchNodes"]["edges"]]
    assert (await services.jobs.usage("key-" + hash_key(KEY)[:12])).tokens > 0


async def test_identical_requests_are_served_from_the_store(
    setup: tuple[httpx.AsyncClient, Services], fake: FakeOpenAI
) -> None:
    client, _ = setup
    first = await run_job(client, EXPLAIN, {"n": NODE})
    calls = len(fake.requests)
    second = await run_job(client, EXPLAIN, {"n": NODE})
    assert second["fromStore"] is True and second["result"] == first["result"]
    assert len(fake.requests) == calls


async def test_score_explanation(
    setup: tuple[httpx.AsyncClient, Services], fake: FakeOpenAI, records_dir: Path
) -> None:
    client, _ = setup
    job = await run_job(client, SCORE, {"n": NODE, "t": "opening parentheses"})
    assert job["status"] == "SUCCEEDED"
    truth = [list(e.activations) for e in _all_held_out(records_dir)]
    assert job["result"][0]["score"] == pytest.approx(expected_score(truth), abs=1e-9)
    simulate_prompt = fake.calls("chat")[0]["messages"][1]["content"]
    assert "opening parentheses" in simulate_prompt


async def test_an_explanation_with_control_characters_is_refused(
    setup: tuple[httpx.AsyncClient, Services], fake: FakeOpenAI
) -> None:
    client, _ = setup
    body = await graphql(client, SCORE, {"n": NODE, "t": "opening\0parentheses"})
    assert error_codes(body) == ["INVALID_ARGUMENT"]
    assert "U+0000 at index 7" in body["errors"][0]["message"]
    assert fake.calls("chat") == []  # refused before any job or model call


def _all_held_out(records_dir: Path) -> list[Any]:
    record = RecordStore.load(records_dir / "records").node_record("mlp_neuron", 1, 7)
    return [e for e in record.top if e.offset >= 0] + [
        e for e in record.random[:5] if e.offset >= 0
    ]


async def test_malformed_simulation_is_retried(
    setup: tuple[httpx.AsyncClient, Services], fake: FakeOpenAI, records_dir: Path
) -> None:
    client, _ = setup
    fake.then("chat", reply("not json"), reply('{"activations": [1, 2]}'))
    job = await run_job(client, SCORE, {"n": NODE, "t": "x"})
    assert job["status"] == "SUCCEEDED"
    # One simulation per held-out record, two of them asked again after a malformed answer.
    assert len(fake.calls("chat")) == len(_all_held_out(records_dir)) + 2
    truth = [list(e.activations) for e in _all_held_out(records_dir)]
    assert job["result"][0]["score"] == pytest.approx(expected_score(truth), abs=1e-9)


async def test_always_malformed_simulation_fails_and_stores_nothing(
    setup: tuple[httpx.AsyncClient, Services], fake: FakeOpenAI
) -> None:
    client, services = setup
    fake.then("chat", *[reply("[1, 2, 3]")] * 60)
    job = await run_job(client, SCORE, {"n": NODE, "t": "y"})
    assert job["status"] == "FAILED" and "no valid simulation" in job["error"]
    assert services.explaining is not None and services.explaining.store.all() == []


async def test_rate_limit_then_success(
    setup: tuple[httpx.AsyncClient, Services], fake: FakeOpenAI
) -> None:
    client, _ = setup
    fake.then("chat", status(429))
    job = await run_job(client, EXPLAIN, {"n": NODE})
    assert job["status"] == "SUCCEEDED"
    assert fake.calls("chat")[0] == fake.calls("chat")[1]  # the same request, retried


async def test_timeouts_fail_the_job_and_keep_what_was_stored(
    setup: tuple[httpx.AsyncClient, Services], fake: FakeOpenAI
) -> None:
    client, services = setup
    assert (await run_job(client, SCORE, {"n": NODE, "t": "kept"}))["status"] == "SUCCEEDED"
    fake.then("chat", *[slow(2.0)] * 3)
    job = await run_job(client, EXPLAIN, {"n": "small/mlp_neuron/2/3"})
    assert job["status"] == "FAILED" and "timed out" in job["error"]
    assert services.explaining is not None
    assert [s.data.text for s in services.explaining.store.all()] == ["kept"]


async def test_server_errors_fail_with_the_status(
    setup: tuple[httpx.AsyncClient, Services], fake: FakeOpenAI
) -> None:
    client, _ = setup
    fake.then("chat", *[status(503)] * 3)
    job = await run_job(client, EXPLAIN, {"n": NODE})
    assert job["status"] == "FAILED" and "HTTP 503" in job["error"]


async def test_unauthenticated(setup: tuple[httpx.AsyncClient, Services]) -> None:
    client, _ = setup
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong"}):
        body = (
            await client.post(
                "/graphql", json={"query": EXPLAIN, "variables": {"n": NODE}}, headers=headers
            )
        ).json()
        assert error_codes(body) == ["UNAUTHENTICATED"]


async def test_no_configured_key_says_how_to_enable_one(client: httpx.AsyncClient) -> None:
    # The session client's server has no keys: a caller cannot guess that none can work.
    body = await graphql(client, SCORE, {"n": NODE, "t": EXPLANATION})
    assert error_codes(body) == ["UNAUTHENTICATED"]
    message = body["errors"][0]["message"]
    assert "none configured" in message and "--api-key" in message


async def test_per_key_job_limit(
    setup: tuple[httpx.AsyncClient, Services], fake: FakeOpenAI
) -> None:
    client, _ = setup
    fake.then("chat", slow(0.5), slow(0.5))
    codes = []
    for node in ("small/mlp_neuron/0/1", "small/mlp_neuron/0/2", "small/mlp_neuron/0/3"):
        codes.append(error_codes(await graphql(client, EXPLAIN, {"n": node})))
    assert codes == [[], [], ["RATE_LIMITED"]]


async def test_token_quota(setup: tuple[httpx.AsyncClient, Services]) -> None:
    client, services = setup
    services.jobs.spend("key-" + hash_key(KEY)[:12], 10_000)
    assert error_codes(await graphql(client, EXPLAIN, {"n": NODE})) == ["QUOTA_EXCEEDED"]


async def test_no_records_is_a_failed_job(setup: tuple[httpx.AsyncClient, Services]) -> None:
    client, _ = setup
    job = await run_job(client, EXPLAIN, {"n": "small/attention_head/0/1"})
    assert job["status"] == "FAILED" and "no dataset records" in job["error"]


async def test_baseline_works_offline(
    setup: tuple[httpx.AsyncClient, Services], fake: FakeOpenAI
) -> None:
    client, _ = setup
    job = await run_job(
        client,
        'mutation($n: ID!) { explainNode(nodeId: $n, options: {method: "baseline"}) { id } }',
        {"n": NODE},
    )
    assert (
        job["status"] == "SUCCEEDED" and job["result"][0]["explainerModel"] == "baseline-top-tokens"
    )
    assert fake.requests == []
    assert math.isfinite(job["result"][0]["score"])


async def test_job_updates_stream_in_order(setup: tuple[httpx.AsyncClient, Services]) -> None:
    client, services = setup
    body = await graphql(client, EXPLAIN, {"n": NODE})
    job_id = body["data"]["explainNode"]["id"]
    context = RequestContext.create(services)
    context.connection_params = AUTH  # the job belongs to this key
    stream = await build_schema().subscribe(
        "subscription($id: ID!) { jobUpdates(id: $id) { sequence status progress message } }",
        variable_values={"id": job_id},
        context_value=context,
    )
    events = [e.data["jobUpdates"] async for e in stream]  # type: ignore[union-attr]
    assert [e["sequence"] for e in events] == list(range(len(events)))
    assert events[0]["status"] == "QUEUED" and events[-1]["status"] == "SUCCEEDED"
    progress = [e["progress"] for e in events]
    assert progress == sorted(progress) and progress[-1] == 1.0


async def test_job_updates_over_multipart_http(setup: tuple[httpx.AsyncClient, Services]) -> None:
    client, _ = setup
    job_id = (await graphql(client, EXPLAIN, {"n": NODE}))["data"]["explainNode"]["id"]
    response = await client.post(
        "/graphql",
        json={
            "query": "subscription($id: ID!) { jobUpdates(id: $id) { sequence status } }",
            "variables": {"id": job_id},
        },
        headers={
            "Accept": "multipart/mixed;boundary=graphql;subscriptionSpec=1.0,application/json"
        },
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("multipart/mixed")
    statuses = re.findall(r'"status":\s*"(\w+)"', response.text)
    assert statuses[0] == "QUEUED" and statuses[-1] == "SUCCEEDED"


def completion_with_prompt_logprobs(body: dict[str, Any]) -> tuple[int, dict[str, Any], float]:
    """Echoes the prompt as tokens (runs of spaces, of letters, and single other characters,
    with their real text offsets); where "unknown" follows a tab, the digits 3 and 7 are
    equally likely, elsewhere the token itself is certain."""
    words = re.findall(r" ?[A-Za-z]+|\s+|.", body["prompt"], re.DOTALL)
    offsets = [0]
    for word in words[:-1]:
        offsets.append(offsets[-1] + len(word))
    top = [
        {"3": math.log(0.5), "7": math.log(0.5)}
        if w == "unknown" and i > 0 and words[i - 1].endswith("\t")
        else {w: 0.0}
        for i, w in enumerate(words)
    ]
    answer = {
        "id": "cmpl-test",
        "object": "text_completion",
        "created": 0,
        "model": "fake-model",
        "choices": [
            {
                "index": 0,
                "text": body["prompt"],
                "finish_reason": "length",
                "logprobs": {
                    "tokens": words,
                    "token_logprobs": [0.0] * len(words),
                    "top_logprobs": top,
                    "text_offset": offsets,
                },
            }
        ],
        "usage": {"prompt_tokens": len(words), "completion_tokens": 0, "total_tokens": len(words)},
    }
    return 200, answer, 0.0


async def test_logprob_simulator_reads_expected_values(fake: FakeOpenAI) -> None:
    from interpql.backends.explanations.api import AutoSimulator, LogprobSimulator

    settings = ApiSettings(base_url=fake.base_url, api_key="sk-fake", max_retries=0)
    client = settings.client()
    fake.then("completions", completion_with_prompt_logprobs)
    simulator = LogprobSimulator(settings, client=client)
    assert await simulator.simulate("brackets", ["a", "(", "b"]) == [5.0, 5.0, 5.0]
    # A record's own token may read "unknown": placeholders are found by position, not text.
    fake.then("completions", completion_with_prompt_logprobs)
    tokens = ["x", " unknown", "unknown", "\tunknown", "y"]
    assert await simulator.simulate("unknown things", tokens) == [5.0] * 5
    assert fake.calls("completions")[0]["echo"] is True
    # A server without prompt logprobs: the automatic simulator falls back to JSON, for good.
    fake.then("completions", status(404))
    auto = AutoSimulator(settings, client=client)
    fake.then("chat", reply('{"activations": [0, 10]}'), reply('{"activations": [1, 2]}'))
    assert await auto.simulate("x", ["a", "b"]) == [0.0, 10.0]
    assert await auto.simulate("x", ["a", "b"]) == [1.0, 2.0]
    assert len(fake.calls("completions")) == 3 and auto.name.endswith("(json)")
    await client.close()


def test_serve_command_wires_sources_keys_and_the_api(tmp_path: Path, fake: FakeOpenAI) -> None:
    """`interpql serve` with --source, --api-key and --openai-base-url, end to end over HTTP."""
    from tests.test_node_sources import explanation_line, neuron_record
    from tests.test_server import serve

    (tmp_path / "records" / "0").mkdir(parents=True)
    (tmp_path / "explanations" / "0").mkdir(parents=True)
    (tmp_path / "records" / "0" / "5.json").write_text(json.dumps(neuron_record(0, 5)))
    (tmp_path / "explanations" / "0" / "5.jsonl").write_text(explanation_line(0, 5, "defs", 0.3))
    source = f"name=folder,kind=mlp_neuron,records={tmp_path / 'records'},explanations={tmp_path / 'explanations'}"
    args = [
        "--model",
        "random:tiny",
        "--name",
        "tiny",
        "--source",
        source,
        "--api-key",
        KEY,
        "--openai-base-url",
        fake.base_url,
        "--openai-api-key",
        "sk-fake",
        "--simulator",
        "json",
        "--explanation-store",
        str(tmp_path / "store.sqlite"),
    ]
    with serve(*args) as url:
        node = httpx.post(
            url + "/graphql",
            json={
                "query": '{ node(id: "tiny/mlp_neuron/0/5") { statistics { mean } explanations { text } } }'
            },
        ).json()
        assert node["data"]["node"] == {
            "statistics": {"mean": 5.125},
            "explanations": [
                {
                    "text": "defs",
                }
            ],
        }
        denied = httpx.post(
            url + "/graphql", json={"query": EXPLAIN, "variables": {"n": "tiny/mlp_neuron/0/5"}}
        )
        assert error_codes(denied.json()) == ["UNAUTHENTICATED"]
        started = httpx.post(
            url + "/graphql",
            json={"query": EXPLAIN, "variables": {"n": "tiny/mlp_neuron/0/5"}},
            headers=AUTH,
        ).json()
        job_id = started["data"]["explainNode"]["id"]
        for _ in range(100):
            job = httpx.post(
                url + "/graphql",
                json={
                    "query": "query($id: ID!) { job(id: $id) { status error result { text } } }",
                    "variables": {"id": job_id},
                },
                headers=AUTH,
            ).json()["data"]["job"]
            if job["status"] in ("SUCCEEDED", "FAILED"):
                break
            time.sleep(0.05)
        assert job["status"] == "SUCCEEDED", job
        assert job["result"] == [{"text": EXPLANATION}]


def test_calibration_is_an_out_of_sample_rsquared() -> None:
    from interpql.backends.explanations.scoring import calibrated_rsquared

    true = [[0.0, 1.0, 2.0], [0.0, 2.0, 4.0], [1.0, 1.0, 3.0], [0.5, 2.5, 4.5]]
    simulated = [[0.0, 5.0, 10.0], [1.0, 2.0, 8.0], [0.0, 3.0, 9.0], [2.0, 6.0, 9.0]]
    slope, intercept = np.polyfit(np.concatenate(simulated[0::2]), np.concatenate(true[0::2]), 1)
    test_t, test_s = np.concatenate(true[1::2]), np.concatenate(simulated[1::2])
    residual = test_t - (slope * test_s + intercept)
    expected = 1 - (residual @ residual) / ((test_t - test_t.mean()) @ (test_t - test_t.mean()))
    assert calibrated_rsquared(true, simulated) == pytest.approx(expected)
    assert calibrated_rsquared(true[:1], simulated[:1]) == 0.0


async def test_auto_simulation_scores_every_record_with_one_simulator(fake: FakeOpenAI) -> None:
    """Concurrent simulations wait for the first to decide; records containing the token
    " unknown" no longer push some of them onto the other simulator."""
    from interpql.backends.explanations.api import AutoSimulator
    from interpql.backends.explanations.base import ActivationExample
    from interpql.backends.explanations.scoring import score_explanation

    settings = ApiSettings(base_url=fake.base_url, api_key="sk-fake", max_retries=0)
    client = settings.client()
    fake.default["completions"] = completion_with_prompt_logprobs
    held_out = [
        ActivationExample(["a", " unknown", "b"], [0.0, 1.0, 2.0]),
        ActivationExample(["unknown", "c"], [3.0, 0.0]),
        ActivationExample(["d", "e", " unknown", "f"], [1.0, 0.0, 0.0, 2.0]),
    ]
    scored = await score_explanation(AutoSimulator(settings, client=client), "x", held_out)
    assert scored.simulator.endswith("(logprobs)")
    assert len(fake.calls("completions")) == 3 and not fake.calls("chat")
    assert [s.simulated_activations for s in scored.sequences] == [[5.0] * 3, [5.0] * 2, [5.0] * 4]
    await client.close()


async def test_one_failed_simulation_cancels_the_others(fake: FakeOpenAI) -> None:
    """No request goes out for a score that has already failed (the held answers would each be
    retried twice as malformed, were their simulations still running)."""
    import threading

    from interpql.backends.explanations.api import JsonSimulator
    from interpql.backends.explanations.base import ActivationExample
    from interpql.backends.explanations.scoring import score_explanation

    release = threading.Event()
    fake.then(
        "chat",
        lambda body: (200, chat_answer("not json"), release),
        lambda body: (200, chat_answer("not json"), release),
        status(400),
    )
    settings = ApiSettings(base_url=fake.base_url, api_key="sk-fake", max_retries=0)
    client = settings.client()
    held_out = [ActivationExample([t], [1.0]) for t in ("a", "b", "c")]
    with pytest.raises(Exception, match="400"):
        await score_explanation(JsonSimulator(settings, client=client), "x", held_out)
    sent = len(fake.calls("chat"))
    release.set()
    await asyncio.sleep(0.5)
    assert sent == 3 and len(fake.calls("chat")) == sent
    await client.close()


async def test_identical_candidates_are_scored_and_stored_once(
    setup: tuple[httpx.AsyncClient, Services], fake: FakeOpenAI
) -> None:
    client, services = setup
    fake.then("chat", reply(EXPLANATION, EXPLANATION.upper(), f"  {EXPLANATION} ", "another one"))
    job = await run_job(
        client,
        'mutation($n: ID!) { explainNode(nodeId: $n, options: {method: "api", explanations: 4}) '
        "{ id } }",
        {"n": NODE},
    )
    assert job["status"] == "SUCCEEDED", job
    assert [r["text"] for r in job["result"]] == [EXPLANATION, "another one"]
    assert services.explaining is not None
    assert [s.data.text for s in services.explaining.store.all()] == [EXPLANATION, "another one"]
    # Each distinct explanation simulated once on each held-out record.
    simulated = Counter(
        re.search(r"looks for (.*)\.\n", c["messages"][1]["content"]).group(1)  # type: ignore[union-attr]
        for c in fake.calls("chat")
        if "summarize" not in c["messages"][0]["content"]
    )
    assert set(simulated) == {EXPLANATION, "another one"}
    assert simulated[EXPLANATION] == simulated["another one"]


async def test_a_job_that_cannot_store_says_so_in_words(
    setup: tuple[httpx.AsyncClient, Services], fake: FakeOpenAI
) -> None:
    client, services = setup
    assert services.explaining is not None
    services.explaining.store._db.close()  # as a disk that fails mid-run would
    job = await run_job(client, EXPLAIN, {"n": NODE})
    assert job["status"] == "FAILED"
    assert job["error"].startswith("The explanation store could not be written")
    assert "Error" not in job["error"] and "sqlite" not in job["error"].lower()


async def test_a_full_disk_is_named_in_the_jobs_error(
    setup: tuple[httpx.AsyncClient, Services], fake: FakeOpenAI
) -> None:
    """It said "the disk may be full, or the file read-only or damaged": SQLite knows which."""
    client, services = setup
    assert services.explaining is not None
    store = services.explaining.store
    (pages,) = store._db.execute("PRAGMA page_count").fetchone()
    store._db.execute(f"PRAGMA max_page_count = {pages}")  # as a disk with no page more
    with pytest.raises(sqlite3.OperationalError, match="full"):
        for _ in range(1000):  # until the pages it has are full too
            store.add(parse_node_id(NODE), "filler " * 20, None, "s", "e")
    before = len(store.all())
    job = await run_job(client, EXPLAIN, {"n": NODE})
    assert job["status"] == "FAILED"
    assert job["error"].startswith("The explanation store could not be written (the disk is full)")
    assert len(store.all()) == before
