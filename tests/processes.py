"""Real processes the tests start: `interpql serve` and `redis-server`, each on a free loopback
port, stopped when the block ends."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def serve(*args: str, startup_s: float = 60) -> Iterator[str]:
    """`interpql serve ARGS`; yields its base URL once /healthz answers."""
    with serve_process(*args, startup_s=startup_s) as (url, _):
        yield url


@contextmanager
def serve_process(
    *args: str, startup_s: float = 60
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Like `serve`, and the process too (to signal it, or read what it logged)."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "interpql.cli", "serve", "--port", str(port), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_s
        while True:
            if process.poll() is not None:
                output = process.stdout.read().decode() if process.stdout else ""
                raise AssertionError(f"server exited with {process.returncode}:\n{output}")
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"server did not start in {startup_s} s")
            time.sleep(0.2)
        yield url, process
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process.stdout:
            process.stdout.close()


@contextmanager
def redis_server(directory: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A real redis-server (no persistence); yields its URL and process."""
    executable = shutil.which("redis-server")
    assert executable, "redis-server is installed by the Makefile"
    port = free_port()
    options = ["--save", "", "--appendonly", "no", "--dir", str(directory)]
    process = subprocess.Popen(
        [executable, "--port", str(port), "--bind", "127.0.0.1", *options],
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0", process
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=10)
