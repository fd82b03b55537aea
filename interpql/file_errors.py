"""Files the server is pointed at (weights, autoencoders, records, stores) that cannot be used.

Whatever a reader raises on a broken file (an UnpicklingError from torch.load, safetensors'
SafetensorError, sqlite3.DatabaseError, a KeyError from a config missing a key) becomes one
`FileProblem` that names the file and says what was expected of it. Start-up turns it into a
one-line message and exit status 2, never a traceback.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any


class FileProblem(ValueError):
    def __init__(self, path: str | Path, why: str) -> None:
        super().__init__(f"{path}: {why}")
        self.path = str(path)


@contextlib.contextmanager
def reading(path: str | Path, expected: str) -> Iterator[None]:
    """Any failure inside the block is a FileProblem: `path` is not `expected` (e.g. "a
    safetensors file")."""
    try:
        yield
    except FileProblem:
        raise
    except FileNotFoundError:
        raise FileProblem(path, f"no such file (expected {expected})") from None
    except Exception as exc:
        detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        cause = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
        raise FileProblem(path, f"cannot be read as {expected} ({cause})") from exc


def require_finite(path: str | Path, tensors: Mapping[str, Any]) -> None:
    """FileProblem naming the first floating tensor of `tensors` (torch's) that holds a NaN or
    an infinity: loaded, such weights served NaN, which no GraphQL Float carries, or zeros."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(tensor.isfinite().all()):
            bad = int((~tensor.isfinite()).sum())
            raise FileProblem(path, f"tensor {name!r} holds {bad} NaN or infinite values")


def is_whole(value: Any) -> bool:
    """A JSON number with no fraction (not a bool, which Python counts as an int)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and value == int(value)


def config_size(raw: Mapping[str, Any], key: str, default: Any = None) -> int:
    """raw[key] (else `default`) as a size read from a config file: a whole number of at least
    1. int() read 16.7 as 16 and "false" as whatever came next; 0 heads divided by zero, and a
    negative context was reported as weights that do not fit."""
    value = raw.get(key, default)
    if value is None:
        raise ValueError(f"no {key!r}")
    if not is_whole(value) or value < 1:
        raise ValueError(f"{key} must be a whole number of at least 1, not {value!r}")
    return int(value)


def open_sqlite(path: str | Path, what: str) -> sqlite3.Connection:
    """A connection to a SQLite file that is whole and writable, checked now: a corrupt page or
    a read-only file found later would fail a job after its work (and its API tokens) were
    spent. FileProblem says which of the two it is."""
    path = Path(path)
    try:
        # The store's own folder (the default's .interpql/), not a tree: a mistyped path
        # should be refused, not quietly made.
        path.parent.mkdir(exist_ok=True)
    except FileNotFoundError:
        raise FileProblem(
            path.parent,
            f"cannot create the folder of {what}: {path.parent.parent} does not exist (only "
            "the path's last folder is made)",
        ) from None
    except OSError as exc:
        raise FileProblem(path.parent, f"cannot create the folder of {what} ({exc})") from exc
    try:
        db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
    except sqlite3.Error as exc:
        raise FileProblem(path, f"cannot open {what} ({exc})") from exc
    try:
        (verdict,) = db.execute("PRAGMA quick_check").fetchone()
    except sqlite3.DatabaseError as exc:
        db.close()
        raise FileProblem(path, f"is not a SQLite database ({exc}); expected {what}") from exc
    if verdict != "ok":
        db.close()
        raise FileProblem(
            path, f"{what} is corrupt (SQLite's integrity check: {verdict}); restore it or move it"
        )
    try:
        db.execute("BEGIN IMMEDIATE")
        db.execute("CREATE TABLE interpql_write_probe (x)")
        db.execute("ROLLBACK")
    except sqlite3.Error as exc:
        db.close()
        raise FileProblem(path, f"{what} is not writable ({exc})") from exc
    return db


@contextlib.contextmanager
def immediate_transaction(db: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE ... COMMIT on `db` (opened with isolation_level=None), rolled back when
    the block raises. SQLite has rolled back already after some failures (a full disk): a
    second ROLLBACK would raise and hide why."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


# SQLite's primary result codes (the low byte of sqlite_errorcode) a store's writes meet, as a
# reader who must act on them would put it.
_SQLITE_REASONS = {
    5: "the file is locked by another program",  # SQLITE_BUSY
    6: "the file is locked by another program",  # SQLITE_LOCKED
    8: "the file is read-only",  # SQLITE_READONLY
    10: "the disk could not be read or written",  # SQLITE_IOERR
    11: "the file is damaged",  # SQLITE_CORRUPT
    13: "the disk is full",  # SQLITE_FULL
    14: "the file cannot be opened",  # SQLITE_CANTOPEN
    26: "the file is not a SQLite database",  # SQLITE_NOTADB
}


def sqlite_reason(exc: sqlite3.Error) -> str:
    """Why a SQLite store refused, in words (the disk is full, the file is read-only, ...)."""
    code = getattr(exc, "sqlite_errorcode", None)
    return _SQLITE_REASONS.get((code or 0) & 0xFF, "the file refused the write")
