"""The TransformerLens backend (`backend.py`); TransformerLens itself is imported only when a
model is loaded."""

from interpql.backends.transformerlens.backend import TransformerLensBackend
from interpql.backends.transformerlens.loading import EXTRA, read_architecture
from interpql.backends.transformerlens.locations import HOOK_NAMES

__all__ = ["EXTRA", "HOOK_NAMES", "TransformerLensBackend", "read_architecture"]
