"""Reading what the server loads from remote storage (az://, gs://, https://, through
blobfile), with progress shown and a bound on silence.

blobfile retries a failing connection forever, so a server pointed at storage it cannot reach
would wait forever at start-up, saying nothing. Here every remote read shows its files and
bytes as they arrive (tqdm, on stderr), and when no byte has arrived for `stall_timeout_s`
(`interpql serve --remote-timeout`, 60 s by default) the load fails with a FileProblem naming
what it was waiting for (start-up then exits 2). Local paths are read directly.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import blobfile as bf

from interpql.file_errors import FileProblem

log = logging.getLogger(__name__)
T = TypeVar("T")

_CHUNK = 1 << 20
_WORKERS = 8
_settings = {"stall_timeout_s": 60.0}


def configure(stall_timeout_s: float) -> None:
    """Seconds without a byte from remote storage before a load gives up (0: never)."""
    _settings["stall_timeout_s"] = stall_timeout_s
    # blobfile logs every retry of an unreachable host to stderr; our progress says it instead.
    bf.configure(log_callback=lambda message: log.debug("blobfile: %s", message))


def is_remote(path: str) -> bool:
    return "://" in path


class _Progress:
    def __init__(self, what: str, files: int, show: bool) -> None:
        self.lock = threading.Lock()
        self.last = time.monotonic()
        self.files = files
        self.done = 0
        self.waiting_for = ""
        self.bar: Any = None
        if show:
            from tqdm import tqdm

            self.bar = tqdm(
                desc=f"{what} (0/{files} files)", unit="B", unit_scale=True, leave=False
            )
        self.what = what

    def started(self, path: str) -> None:
        with self.lock:
            self.waiting_for = path
            self.last = time.monotonic()

    def add(self, n: int) -> None:
        with self.lock:
            self.last = time.monotonic()
            if self.bar is not None:
                self.bar.update(n)

    def finished(self) -> None:
        with self.lock:
            self.done += 1
            self.last = time.monotonic()
            if self.bar is not None:
                self.bar.set_description(f"{self.what} ({self.done}/{self.files} files)")

    def silent_for(self) -> float:
        with self.lock:
            return time.monotonic() - self.last

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def read_files(paths: Sequence[str], what: str) -> list[bytes]:
    """Every file's bytes, in order: remote ones read concurrently, with progress."""
    if not any(is_remote(p) for p in paths):
        return [bf.read_bytes(p) for p in paths]
    progress = _Progress(what, len(paths), show=True)
    results: dict[int, bytes | BaseException] = {}
    todo: queue.Queue[int] = queue.Queue()
    for i in range(len(paths)):
        todo.put(i)

    def work() -> None:
        while True:
            try:
                i = todo.get_nowait()
            except queue.Empty:
                return
            progress.started(paths[i])
            try:
                chunks = []
                with bf.BlobFile(paths[i], "rb") as f:
                    while chunk := f.read(_CHUNK):
                        chunks.append(chunk)
                        progress.add(len(chunk))
                results[i] = b"".join(chunks)
            except BaseException as exc:  # handed to the waiting thread
                results[i] = exc
            progress.finished()

    # Daemon threads: a read stuck on an unreachable host must not keep the process alive.
    for _ in range(min(_WORKERS, len(paths))):
        threading.Thread(target=work, daemon=True, name="remote-read").start()
    try:
        _wait(lambda: len(results) == len(paths), progress)
    finally:
        progress.close()
    ordered = []
    for i in range(len(paths)):
        found = results[i]
        if isinstance(found, BaseException):
            raise FileProblem(paths[i], f"cannot be read ({type(found).__name__}: {found})")
        ordered.append(found)
    return ordered


def call(fn: Callable[[], T], what: str, path: str) -> T:
    """A remote metadata call (exists, listdir, isdir), bounded by the stall timeout."""
    if not is_remote(path):
        return fn()
    progress = _Progress(what, 1, show=False)
    progress.started(path)
    box: list[T | BaseException] = []

    def work() -> None:
        try:
            box.append(fn())
        except BaseException as exc:
            box.append(exc)

    threading.Thread(target=work, daemon=True, name="remote-call").start()
    _wait(lambda: bool(box), progress)
    found = box[0]
    if isinstance(found, BaseException):
        raise FileProblem(path, f"cannot be reached ({type(found).__name__}: {found})")
    return found


def _wait(done: Callable[[], bool], progress: _Progress) -> None:
    limit = _settings["stall_timeout_s"]
    while not done():
        time.sleep(0.05)
        if limit > 0 and progress.silent_for() > limit:
            raise FileProblem(
                progress.waiting_for,
                f"no data arrived for {limit:g} s while loading {progress.what}; is the storage "
                "reachable from here? (--remote-timeout sets how long to wait)",
            )
