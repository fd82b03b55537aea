"""Long-running jobs (explaining and scoring nodes): status, progress and results, and the
events that subscriptions stream, kept in a store every replica shares.

A job is an asyncio task of the server that accepted it (`manager.py`). Every change is an
event, kept in order, so a subscriber that arrives late first gets what it missed and then waits
for the rest, on any server sharing the store. Limits are per API key, counted in the store:
jobs at once (RATE_LIMITED) and tokens spent (QUOTA_EXCEEDED). The store (`base.py`'s
JobStore) is a SQLite file, or memory (`sqlite_store.py`), or Redis (`redis_store.py`).
"""

from interpql.loaders.jobs.base import (
    STOPPED,
    Job,
    JobChange,
    JobEvent,
    JobStatus,
    JobStore,
    KeyUsage,
    Limits,
    SharedStateUnavailable,
)
from interpql.loaders.jobs.manager import (
    JobManager,
    Progress,
    Work,
    describe_failure,
    open_store,
)
from interpql.loaders.jobs.redis_store import RedisJobStore
from interpql.loaders.jobs.sqlite_store import SqliteJobStore

__all__ = [
    "STOPPED",
    "Job",
    "JobChange",
    "JobEvent",
    "JobManager",
    "JobStatus",
    "JobStore",
    "KeyUsage",
    "Limits",
    "Progress",
    "RedisJobStore",
    "SharedStateUnavailable",
    "SqliteJobStore",
    "Work",
    "describe_failure",
    "open_store",
]
