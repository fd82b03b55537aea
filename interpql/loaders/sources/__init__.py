"""Sources of what is known about nodes; see `base.py` for the interface."""

from interpql.loaders.sources.base import (
    Example,
    ExplanationData,
    NodeRecordData,
    NodeSource,
    RecordAnswer,
    Statistics,
)
from interpql.loaders.sources.compact import CompactSource
from interpql.loaders.sources.store import ExplanationStore, StoredExplanation
from interpql.loaders.sources.tdb import BrokenRecordError, TdbFolderSource

__all__ = [
    "BrokenRecordError",
    "CompactSource",
    "Example",
    "ExplanationData",
    "ExplanationStore",
    "NodeRecordData",
    "NodeSource",
    "RecordAnswer",
    "Statistics",
    "StoredExplanation",
    "TdbFolderSource",
]
