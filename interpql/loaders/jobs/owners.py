"""Which server instance runs a job, and whether it still can.

An owner is `host|pid-namespace|pid|random`. It is gone when its lease in the store lapsed, or,
seen from the same host and pid namespace, when its process no longer runs: a server killed
with SIGKILL and started again finds its predecessor's jobs at once, without waiting for the
lease.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Collection
from pathlib import Path


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""  # not Linux: only leases tell


def new_owner() -> str:
    return f"{socket.gethostname()}|{_pid_namespace()}|{os.getpid()}|{uuid.uuid4().hex[:8]}"


def stopped(owner: str, live: Collection[str], me: str) -> bool:
    """Whether `owner` can no longer finish its jobs, as `me` sees it."""
    if owner == me:
        return False
    if owner not in live:
        return True
    parts, mine = owner.rsplit("|", 3), me.rsplit("|", 3)
    if len(parts) != 4 or not parts[1] or parts[:2] != mine[:2] or not parts[2].isdigit():
        return False
    pid = int(parts[2])
    # A restarted container may give its new server the old one's pid: that owner is gone.
    return pid == os.getpid() or not _running(pid)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        # A killed process its parent has not reaped yet is a zombie: it runs nothing.
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[:1] != ["Z"]
