"""The native GPT-2 backend."""

from interpql.backends.gpt2.backend import NativeGPT2Backend
from interpql.backends.gpt2.model import GPT2, PRESETS, GPT2Config

__all__ = ["GPT2", "PRESETS", "GPT2Config", "NativeGPT2Backend"]
