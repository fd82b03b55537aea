"""Real processes the tests start: `interpql serve` and `redis-server`, each on a free loopback
port, stopped when the block ends."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def serve(*args: str, startup_s: float = 60) -> Iterator[str]:
    """`interpql serve ARGS`; yields its base URL once /healthz answers. What the server logs
    is read (and dropped) as it comes, so a long run cannot fill the pipe and stall it."""
    with serve_process(*args, startup_s=startup_s, drain_output=True) as (url, _):
        yield url


@contextmanager
def serve_process(
    *args: str,
    startup_s: float = 60,
    preexec_fn: Callable[[], None] | None = None,
    drain_output: bool = False,
    command: Sequence[str] = (sys.executable, "-m", "interpql.cli"),
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Like `serve`, and the process too (to signal it, or read what it logged: the caller
    reads its stdout, or a chatty server blocks once the pipe is full). `preexec_fn` runs in
    the child before it starts (e.g. to set resource limits); `command` is what runs
    `interpql` (another installation's, say), in `cwd` with `env`."""
    port = free_port()
    process = subprocess.Popen(
        [*command, "serve", "--port", str(port), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        preexec_fn=preexec_fn,
        cwd=cwd,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    drain: threading.Thread | None = None
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
        if drain_output and process.stdout is not None:
            drain = threading.Thread(target=process.stdout.read, daemon=True)
            drain.start()
        yield url, process
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if drain is not None:
            drain.join(timeout=10)  # it ends at the pipe's end, once the server has exited
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


@contextmanager
def ray_head(num_cpus: int = 2, startup_s: float = 90) -> Iterator[str]:
    """A one-node Ray cluster (`ray start --head --block`) on free ports; yields its address.
    SIGTERM to the blocking `ray start` stops every process it started.

    Token authentication is on, with the token in this process's environment (RAY_AUTH_MODE,
    RAY_AUTH_TOKEN) while the block runs, so that processes started inside it can join.
    """
    import os
    import secrets
    import tempfile
    import threading

    # Ray's socket paths must stay short: a directory right under /tmp.
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    port = free_port()
    options = [
        f"--port={port}",
        f"--num-cpus={num_cpus}",
        f"--ray-client-server-port={free_port()}",
        f"--dashboard-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        "--include-dashboard=false",
        "--disable-usage-stats",
        f"--temp-dir={temp}",
    ]
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    saved = {name: os.environ.get(name) for name in auth}
    os.environ.update(auth)
    process = subprocess.Popen(
        [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", *options],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # Nothing to drain in a throwaway cluster: stop at once rather than in 30 s.
        env={**os.environ, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"},
    )
    started = threading.Event()
    lines: list[str] = []

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)
            if "Ray runtime started" in line:
                started.set()
        started.set()  # ended: the check below reports it

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        ready = started.wait(startup_s)
        if not ready or process.poll() is not None:
            raise AssertionError("ray start --head did not start:\n" + "".join(lines))
        yield f"127.0.0.1:{port}"
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        reader.join(timeout=10)
        if process.stdout:
            process.stdout.close()
        shutil.rmtree(temp, ignore_errors=True)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
