"""Backends as Ray Serve deployments.

First, without Ray: requests of several callers merged into one pass give each caller exactly
what its own pass gives. Then a real one-node cluster (`ray start --head`, token auth on), the
demo deployed on it by `interpql deploy`, and two `interpql serve --ray` processes: their answers
equal an in-process server's, and their concurrent requests share the deployment's passes.
"""

from __future__ import annotations

import pickle
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import torch

from interpql.backends.autoencoder import SparseAutoencoder
from interpql.backends.base import (
    Addition,
    AutoencoderInput,
    ForwardRequest,
    ForwardResult,
    HookPoint,
    Intervention,
    Location,
    LogitPositions,
    Trace,
)
from interpql.backends.gpt2 import NativeGPT2Backend
from interpql.backends.gpt2.loading import random_model
from interpql.backends.ray_serve import merging
from interpql.backends.tokenizer import gpt2_encoding
from interpql.specs import LossKind, LossSpec
from tests.conftest import SMALL
from tests.processes import free_port, ray_head, redis_server, serve, serve_process
from tests.test_explaining import AUTH, KEY
from tests.test_jobs import job_updates

P = HookPoint
LATENTS = P(1, Location.LATENTS, "mlp_autoencoder_latent")


@pytest.fixture(scope="module")
def backend() -> NativeGPT2Backend:
    backend = NativeGPT2Backend(random_model(SMALL, seed=7))
    torch.manual_seed(7)
    autoencoder = SparseAutoencoder(SMALL.d_mlp, 32)
    backend.attach_autoencoder(1, AutoencoderInput.MLP_POST_ACT, autoencoder)
    return backend


def assert_same(alone: ForwardResult, shared: ForwardResult) -> None:
    assert shared.lengths == alone.lengths
    close = {"atol": 1e-5, "rtol": 1e-5}
    torch.testing.assert_close(shared.logits, alone.logits, **close)
    torch.testing.assert_close(shared.next_token_loss, alone.next_token_loss, equal_nan=True)
    assert shared.activations.keys() == alone.activations.keys()
    for point, act in alone.activations.items():
        torch.testing.assert_close(shared.activations[point], act, **close)
    assert shared.gradients.keys() == alone.gradients.keys()
    for point, grad in alone.gradients.items():
        torch.testing.assert_close(shared.gradients[point], grad, **close)
    if alone.backward_loss is None:
        assert shared.backward_loss is None
    else:
        assert shared.backward_loss is not None
        torch.testing.assert_close(shared.backward_loss, alone.backward_loss, **close)


def run_merged(backend: NativeGPT2Backend, requests: list[ForwardRequest]) -> list[ForwardResult]:
    assert [sorted(p) for p in merging.plan(requests)] == [list(range(len(requests)))]
    return merging.split(backend.forward(merging.merge(requests)), requests)


def test_merged_forward_gives_each_caller_its_own_pass(backend: NativeGPT2Backend) -> None:
    first = ForwardRequest(
        tokens=((11, 12, 13, 14, 15), (16, 17)),
        save=frozenset({P(0, Location.MLP_POST), P(1, Location.ATTN_PROBS), LATENTS}),
        interventions=(
            Intervention(point=P(0, Location.MLP_POST), value=0.0, position=1, index=(3,)),
            Intervention(point=P(1, Location.ATTN_Z), value=0.5, index=(2, 4), row=1),
        ),
        additions=(Addition(point=P(1, Location.RESID_MID), vector=tuple([0.1] * SMALL.d_model)),),
    )
    second = ForwardRequest(
        tokens=((9, 8, 7),),
        save=frozenset({P(2, Location.RESID_POST), P(1, Location.ATTN_PROBS)}),
        # Overwriting latents splices the autoencoder in: with its error term, other callers'
        # rows are untouched by it.
        interventions=(Intervention(point=LATENTS, value=2.0, index=(4,)),),
    )
    requests = [first, second]
    for alone, shared in zip(
        [backend.forward(r) for r in requests], run_merged(backend, requests), strict=True
    ):
        assert_same(alone, shared)
        assert shared.pass_rows == 3
    # Key axes of attention probabilities are cut back to the caller's own longest prompt.
    assert run_merged(backend, requests)[1].activations[P(1, Location.ATTN_PROBS)].shape == (
        1,
        3,
        SMALL.n_heads,
        3,
    )


def test_each_caller_gets_the_logits_it_asked_for_and_no_more(backend: NativeGPT2Backend) -> None:
    prompts = [((11, 12, 13, 14, 15), (16, 17)), ((9, 8, 7),), ((3, 4, 5, 6),)]
    requests = [
        ForwardRequest(tokens=tokens, logits=positions)
        for tokens, positions in zip(
            prompts, (LogitPositions.LAST, LogitPositions.ALL, LogitPositions.NONE), strict=True
        )
    ]
    shared = run_merged(backend, requests)
    for alone, part in zip([backend.forward(r) for r in requests], shared, strict=True):
        assert part.logit_positions is alone.logit_positions
        assert_same(alone, part)
    assert [tuple(p.logits.shape[:2]) for p in shared] == [(2, 1), (1, 3), (1, 0)]


def test_merged_backward_and_trace_give_each_caller_its_gradients(
    backend: NativeGPT2Backend,
) -> None:
    loss = LossSpec(kind=LossKind.LOGIT_DIFF, targets=(5,), distractors=(6,))
    grads = frozenset({P(1, Location.MLP_POST), P(2, Location.RESID_POST)})
    for trace in (None, Trace(point=P(1, Location.MLP_POST), position=1, index=(2,))):
        requests = [
            ForwardRequest(
                tokens=((1, 2, 3), (4, 5, 6, 7)),
                save=frozenset({P(0, Location.ATTN_Z)}),
                backward=loss,
                trace=trace,
                save_grads=grads,
                interventions=(Intervention(point=P(0, Location.MLP_POST), value=1.0, index=(0,)),),
            ),
            ForwardRequest(
                tokens=((8, 9, 10, 11, 12),), backward=loss, trace=trace, save_grads=grads
            ),
        ]
        for alone, shared in zip(
            [backend.forward(r) for r in requests], run_merged(backend, requests), strict=True
        ):
            assert alone.gradients
            assert_same(alone, shared)


def test_requests_that_would_change_each_other_run_apart() -> None:
    tokens = ((1, 2, 3),)
    plain = ForwardRequest(tokens=tokens)
    no_error = ForwardRequest(tokens=tokens, autoencoder_error_term=False)
    # Without the error term, a spliced autoencoder changes the whole row's computation.
    spliced = ForwardRequest(tokens=tokens, save=frozenset({LATENTS}), autoencoder_error_term=False)
    with_loss = ForwardRequest(tokens=tokens, backward=LossSpec())
    past_its_rows = ForwardRequest(
        tokens=tokens,
        interventions=(Intervention(point=P(0, Location.MLP_POST), value=0.0, row=1),),
    )
    past_its_tokens = ForwardRequest(
        tokens=tokens,
        interventions=(Intervention(point=P(0, Location.MLP_POST), value=0.0, position=3),),
    )
    long = ForwardRequest(tokens=(tuple(range(1, 8)),))
    requests = [plain, no_error, spliced, with_loss, past_its_rows, past_its_tokens, long, plain]
    passes = sorted(sorted(p) for p in merging.plan(requests))
    assert passes == [[0, 7], [1], [2], [3], [4], [5], [6]]
    # The same splice on both sides merges.
    assert merging.plan([spliced, spliced]) == [[0, 1]]


def test_a_view_is_sent_without_its_base() -> None:
    base = torch.zeros(64, 1000)
    part = merging.owned(base[3:4, :10])
    assert part.shape == (1, 10)
    assert len(pickle.dumps(part)) < 10_000 < len(pickle.dumps(base[3:4, :10]))


# A real cluster ------------------------------------------------------------------------------

MODEL = "tiny-stdlib"
INFER_LOSS = (
    'query($p: String!) { model(name: "tiny-stdlib") { infer(input: {prompt: $p}) { loss } } }'
)
QUERY = """
query($p: String!) {
  model(name: "tiny-stdlib") {
    name nLayers autoencoders { layer nLatents }
    plain: infer(input: {prompt: $p}) {
      loss objective batchSize
      topPredictions(k: 5) { token { id } logit probability }
      mlp: layerActivations(layer: 1, kind: MLP_NEURON) { shape values }
      heads: layerActivations(layer: 0, kind: ATTENTION_HEAD) { values }
      latents: layerActivations(layer: 2, kind: MLP_AUTOENCODER_LATENT) { values }
    }
    ablated: infer(input: {prompt: $p, ablations: [{nodeId: "tiny-stdlib/mlp_neuron/1/3"},
        {nodeId: "tiny-stdlib/attention_head/0/1", tokenIndex: 2}]}) {
      loss objective batchSize
      mlp: layerActivations(layer: 3, kind: MLP_NEURON) { values }
    }
    gradients: infer(input: {prompt: $p, mlpComponent: AUTOENCODER_LATENT,
        loss: {kind: LOGIT_DIFF, targetTokens: [" a"], distractorTokens: [" b"]}}) {
      objective batchSize
      actTimesGrad: topNodes(group: ACT_TIMES_GRAD, k: 5) { top { node { id } value } tokenSums }
      direct: topNodes(group: DIRECT_EFFECT, k: 5) { top { node { id } value } tokenSums }
    }
    reconstructed: infer(input: {prompt: $p, autoencoderErrorTerm: false,
        ablations: [{nodeId: "tiny-stdlib/mlp_autoencoder_latent/1/7", value: 3}]}) {
      loss objective batchSize
    }
  }
  latent: node(id: "tiny-stdlib/mlp_autoencoder_latent/1/7") {
    scoredTokens(k: 5) { upvotedOutputTokens { token { id } value } }
    similarNodes(first: 3) { node { id } cosine }
  }
  neuron: node(id: "tiny-stdlib/mlp_neuron/2/9") {
    scoredTokens(k: 5) { upvotingInputTokens { token { id } value } }
  }
}
"""
TRACE_AND_GENERATE = """
query($p: String!) {
  model(name: "tiny-stdlib") {
    traced: infer(input: {prompt: $p,
        trace: {upstreamNodeId: "tiny-stdlib/mlp_neuron/2/9", tokenIndex: 3}}) {
      objective
      actTimesGrad: topNodes(group: ACT_TIMES_GRAD, k: 5) { top { node { id } value } }
    }
    generate(input: {prompt: $p, maxTokens: 4,
        steering: [{nodeId: "tiny-stdlib/mlp_autoencoder_latent/2/7", strength: 30}]}) {
      unsteered { tokens { id } }
      steered { tokens { id } }
    }
  }
}
"""
PROMPTS = ["def add(a, b):\n    return a + b", "for item in items:\n    print(item)"]
MEASURED = {"inferenceTimeMs", "memoryBeforeBytes", "memoryAfterBytes", "batchSize"}


@dataclass
class Cluster:
    address: str
    reference: str  # an in-process server of the same model
    servers: list[str]  # two `serve --ray` servers sharing one deployment and one Redis
    callers: set[str]  # how the deployment names them
    backend: Any  # this process's RayBackend (typed loosely: importing ray warns in pytest)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    stores = tmp_path_factory.mktemp("stores")
    with ExitStack() as stack:
        reference = stack.enter_context(serve())
        redis, _ = stack.enter_context(redis_server(tmp_path_factory.mktemp("redis")))
        address = stack.enter_context(ray_head())
        # Batches of two calls, and a first call that waits for a second: every pass of the
        # tests below is shared by the two servers, with no race to lose.
        deployed = interpql(
            "deploy", "--ray", address, "--max-batch-size", "2", "--batch-wait-ms", "10000"
        )
        assert deployed.returncode == 0, deployed.stderr
        assert "16 dictionaries" in deployed.stdout  # the demo's four sets, per layer
        servers = [
            stack.enter_context(
                serve_process(
                    "--ray",
                    address,
                    "--redis",
                    redis,
                    "--api-key",
                    KEY,
                    "--explanation-store",
                    str(stores / f"{name}.sqlite"),
                )
            )
            for name in "ab"
        ]
        with warnings.catch_warnings():
            # Ray Serve's own pydantic models use what pydantic 2 deprecates.
            warnings.simplefilter("ignore", DeprecationWarning)
            import ray

            from interpql.backends.ray_serve.client import connect

        backend = connect(address)
        stack.callback(ray.shutdown)
        callers = {f"{socket.gethostname()}:{process.pid}" for _, process in servers}
        yield Cluster(address, reference, [url for url, _ in servers], callers, backend)


def interpql(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "interpql.cli", *args], capture_output=True, text=True, timeout=180
    )


def post(url: str, query: str, variables: dict[str, Any]) -> dict[str, Any]:
    response = httpx.post(
        url + "/graphql", json={"query": query, "variables": variables}, timeout=120
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    assert "errors" not in body, body
    return body


def assert_close(got: Any, expected: Any, path: str = "") -> None:
    """Equal JSON, floats to 1e-5 (relative to their size above 1); measured fields skipped."""
    if isinstance(expected, dict):
        assert got.keys() == expected.keys(), path
        for key, value in expected.items():
            if key not in MEASURED:
                assert_close(got[key], value, f"{path}.{key}")
    elif isinstance(expected, list):
        assert len(got) == len(expected), path
        for i, (g, e) in enumerate(zip(got, expected, strict=True)):
            assert_close(g, e, f"{path}[{i}]")
    elif isinstance(expected, float):
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-5), path
    else:
        assert got == expected, path


def batch_sizes(body: dict[str, Any]) -> dict[str, int]:
    model = body["data"]["model"]
    return {
        run: model[run]["batchSize"] for run in ("plain", "ablated", "gradients", "reconstructed")
    }


def through_both(
    cluster: Cluster, query: str, prompt: str, generated: tuple[int, int] = (0, 0)
) -> list[dict[str, Any]]:
    """The answers of both Ray-backed servers, asked at once, after checking each against the
    in-process server's answer; the in-process answer comes last. `generated`: the rows and
    steps of a generation in `query`, which the deployment runs without a key-value cache."""
    variables = {"p": prompt}
    expected = post(cluster.reference, query, variables)
    with ThreadPoolExecutor(max_workers=2) as pool:
        answers = list(pool.map(post, cluster.servers, [query] * 2, [variables] * 2))
    rows, steps = generated
    n = len(gpt2_encoding().encode(prompt))
    # The estimate charges the deployment's steps over the sequence so far, the in-process
    # backend's the prompt and then a token a step (schema/cost.py).
    rerun, cached = steps * n + steps * (steps - 1) // 2, n + steps - 1 if steps else 0
    for answer in answers:
        cost = answer["extensions"]["cost"] - expected["extensions"]["cost"]
        assert cost == rows * (rerun - cached)
        assert_close(without_cost(answer), without_cost(expected))
    return [*answers, expected]


def without_cost(answer: dict[str, Any]) -> dict[str, Any]:
    return {**answer, "extensions": {k: v for k, v in answer["extensions"].items() if k != "cost"}}


def recent_passes(cluster: Cluster) -> list[Any]:
    [stats] = cluster.backend.stats()  # one replica
    return list(stats.recent)


def test_answers_equal_in_process_and_both_servers_share_each_pass(cluster: Cluster) -> None:
    before = len(recent_passes(cluster))
    for prompt in PROMPTS:
        *answers, expected = through_both(cluster, QUERY, prompt)
        for answer in answers:
            # The deployment ran both servers' rows together: twice the rows of a pass here.
            assert batch_sizes(answer) == {k: 2 * v for k, v in batch_sizes(expected).items()}

    shared = [r for r in recent_passes(cluster)[before:] if set(r.callers) == cluster.callers]
    # Per prompt: plain and ablated rows in one call per server, then gradients, then the
    # reconstruction (a switch of its own).
    assert sorted(record.rows for record in shared) == [2, 2, 2, 2, 4, 4]


def test_traces_and_steered_generation_equal_in_process(cluster: Cluster) -> None:
    for prompt in PROMPTS:
        *_, expected = through_both(cluster, TRACE_AND_GENERATE, prompt, generated=(2, 4))
        generated = expected["data"]["model"]["generate"]
        assert generated["steered"]["tokens"] != generated["unsteered"]["tokens"]


def test_missing_cluster_application_or_mismatched_options_fail_at_start(
    cluster: Cluster,
) -> None:
    cases = [
        (["--ray", f"127.0.0.1:{free_port()}"], "no Ray cluster answers at"),
        (["--ray", cluster.address, "--app", "nothing"], "no Ray Serve application 'nothing'"),
        (
            ["--ray", cluster.address, "--model", "random:tiny"],
            "runs 'the default model', not 'random:tiny'",
        ),
        (["--ray", cluster.address, "--device", "cuda"], "--device does not apply with --ray"),
    ]
    with ThreadPoolExecutor(max_workers=len(cases)) as pool:
        runs = pool.map(
            lambda args: interpql("serve", "--port", str(free_port()), *args),
            [args for args, _ in cases],
        )
        for done, (_, message) in zip(runs, cases, strict=True):
            assert done.returncode == 2 and message in done.stderr, done.stderr


def test_a_model_that_does_not_load_fails_the_deploy_with_its_reason(cluster: Cluster) -> None:
    done = interpql(
        "deploy", "--ray", cluster.address, "--app", "broken", "--model", "/nonexistent/model"
    )
    assert done.returncode == 2, done.stdout
    assert "did not start" in done.stderr and "/nonexistent/model" in done.stderr, done.stderr


def test_a_job_started_through_one_server_is_followed_through_the_other(
    cluster: Cluster,
) -> None:
    first, second = cluster.servers
    started = httpx.post(
        first + "/graphql",
        json={
            "query": "mutation($n: ID!) { explainNode(nodeId: $n) { id status } }",
            "variables": {"n": f"{MODEL}/mlp_neuron/0/5"},
        },
        headers=AUTH,
    ).json()
    assert "errors" not in started, started
    job_id = started["data"]["explainNode"]["id"]
    with job_updates(second, job_id) as updates:
        events = updates.until(lambda event: event["status"] in ("SUCCEEDED", "FAILED"))
        assert updates.next() is None
    assert events[0]["status"] == "QUEUED" and events[-1]["status"] == "SUCCEEDED", events
    assert [e["sequence"] for e in events] == list(range(len(events)))


def test_a_deleted_deployment_fails_requests_with_a_typed_error(cluster: Cluster) -> None:
    # Last in this module: it takes the deployment away.
    deleted = interpql("deploy", "--ray", cluster.address, "--delete")
    assert deleted.returncode == 0, deleted.stderr
    for url in cluster.servers:
        started = time.monotonic()
        response = httpx.post(
            url + "/graphql",
            json={"query": INFER_LOSS, "variables": {"p": "after the deployment went away"}},
            timeout=120,
        )
        assert response.status_code == 200
        codes = {e["extensions"]["code"] for e in response.json()["errors"]}
        assert codes == {"BACKEND_UNAVAILABLE"}, (codes, time.monotonic() - started)
        assert httpx.get(url + "/healthz").status_code == 200
