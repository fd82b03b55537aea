"""Shared benchmark helpers: a real server process, timing, and where results go."""

from __future__ import annotations

import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import torch

RESULTS = Path(__file__).parent / "results"


def machine() -> dict[str, Any]:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def server(*args: str, checkout: str | None = None) -> Iterator[str]:
    """`interpql serve ARGS` on a free loopback port, until the block ends; with `checkout`,
    the interpql of that source tree (another commit's, to compare)."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "interpql.cli", "serve", "--port", str(port), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=checkout,
        env=None if checkout is None else {**os.environ, "PYTHONPATH": checkout},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode}")
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def post_repeatedly(
    client: httpx.Client, url: str, body: dict[str, Any], repeats: int, warmup: int = 3
) -> tuple[list[float], dict[str, Any]]:
    """Times `repeats` POSTs of a GraphQL body (after `warmup` untimed ones); each answer is
    decoded and must carry no errors. Returns the times and the last answer."""
    answers: list[dict[str, Any]] = []

    def request() -> None:
        answer = orjson.loads(client.post(url + "/graphql", json=body).content)
        assert "errors" not in answer, answer["errors"]
        answers.append(answer)

    for _ in range(warmup):
        request()
    return [timed(request) for _ in range(repeats)], answers[-1]


def summary(seconds: list[float]) -> dict[str, float]:
    ms = sorted(s * 1000 for s in seconds)
    return {
        "median_ms": statistics.median(ms),
        "p10_ms": ms[len(ms) // 10],
        "p90_ms": ms[(len(ms) * 9) // 10],
        "n": len(ms),
    }


def save(name: str, result: dict[str, Any]) -> None:
    RESULTS.mkdir(exist_ok=True)
    result = {"benchmark": name, "date": time.strftime("%Y-%m-%d"), "machine": machine(), **result}
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
